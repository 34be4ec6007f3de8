"""Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4: the semi-supervised (FedWeP-Random,
CPS, Mean Teacher), FCL and core (DCEW + FedProx) rounds under client_strategy='sharded'
over 4 devices (K = 2 clients padded to 4) reproduce the numbers recorded from the
pre-rebuild code (tests/test_port_golden.py). Prints 'OK <case>' per case."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import jax  # noqa: E402

import test_port_golden as golden  # noqa: E402

CASES = {
    "semi_fedwep_random": lambda: golden.case_semi("fedwep_random", client_strategy="sharded"),
    "semi_cps": lambda: golden.case_semi("cps", client_strategy="sharded"),
    "semi_mean_teacher": lambda: golden.case_semi("mean_teacher", client_strategy="sharded"),
    "fcl_fcl": lambda: golden.case_fcl("fcl", client_strategy="sharded"),
    "core": lambda: golden.case_core(client_strategy="sharded"),
}


def main():
  assert jax.device_count() == 4, jax.devices()
  for name in (sys.argv[1:] or CASES):
    golden._close(CASES[name](), golden.GOLDEN[name])
    print(f"OK {name} sharded over 4 devices == recorded", flush=True)


if __name__ == "__main__":
  main()
