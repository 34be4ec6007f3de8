"""The supervised federated algorithms as a real Flower federation: one OS process per
hospital, one server process, gRPC between them (docs/flower.md).

    python -m fedjax_seg.flower.server --config configs/lgg_fedavg.py --workdir DIR \
        --address 127.0.0.1:8080 --num_hospitals 3
    python -m fedjax_seg.flower.client --config configs/lgg_fedavg.py --hospital K \
        --data_root HOSPITAL_K_FOLDER --address 127.0.0.1:8080        # on every hospital

* ``common``  (no Flower import): the algorithm built from the config exactly as
  ``fl/train.train_federated`` builds it, a hospital's own data, the round keys and the
  wire format (what crosses the network is the algorithm's declared upload, as arrays).
* ``client``  one hospital: a ``flwr.client.NumPyClient`` running the algorithm's jitted
  client update on its own data.
* ``server``  a ``flwr.server.strategy.Strategy`` that orders the uploads by hospital,
  runs the project's aggregator and server update, checkpoints with orbax, resumes.
* ``localhost`` a whole federation on one machine as separate processes (tests, demos).

The transport is Flower's gRPC-bidi ``start_server`` / ``start_client`` (present in
flwr 1.42, deprecated there in favour of SuperLink/SuperNode): long-lived client
processes keep their compiled programs across rounds; see docs/flower.md.
"""
