"""fedjax_seg.serve: the viewer's JSON API with Flask's test client.

upload -> job -> stored study; bad uploads -> 4xx JSON and nothing stored; the database holds what
the API shows (volumes recomputed from the saved mask and spacing); a restarted app keeps every study.
"""
import io
import json
import os
import re
import sqlite3
import zipfile

import nibabel as nib
import numpy as np
import pytest

from fedjax_seg import infer, serve

from _serve_common import brats_patient, brats_run, lgg_patient, lgg_run, modality_files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  wd = brats_run(str(tmp_path_factory.mktemp("serve_run")))
  run = infer.load_run(wd)
  folder = brats_patient(str(tmp_path_factory.mktemp("serve_phantom")))
  return run, folder


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
  """(app, test client, data dir, sqlite path) shared by the tests of this module, in order."""
  run, _ = env
  root = tmp_path_factory.mktemp("serve_data")
  db = str(root / "results.db")
  app = serve.create_app(run=run, db_url="sqlite:///" + db, data_dir=str(root / "data"))
  yield app, app.test_client(), str(root / "data"), db
  app.extensions["fedjax_seg"].close()


def _files(paths):
  return [(io.BytesIO(open(p, "rb").read()), os.path.basename(p)) for p in paths]


def _post(client, patient_id, files):
  data = {"files": files}
  if patient_id is not None:
    data["patient_id"] = patient_id
  return client.post("/api/studies", data=data, content_type="multipart/form-data")


def _upload_and_wait(app, client, patient_id, files):
  r = _post(client, patient_id, files)
  assert r.status_code == 202, r.get_json()
  job = r.get_json()["job"]
  assert job["status"] == "queued" and r.headers["Location"] == f"/api/jobs/{job['id']}"
  done = app.extensions["fedjax_seg"].wait(job["id"], timeout=120)
  assert done["status"] == "done", done
  j = client.get(f"/api/jobs/{job['id']}").get_json()
  assert j["progress"] == 1.0 and j["stage"] == "done" and j["study_id"]
  return j["study_id"]


def _snapshot(data_dir, db):
  files = sorted(os.path.relpath(os.path.join(d, f), data_dir)
                 for d, _, fs in os.walk(data_dir) for f in fs if f != "results.db")
  with sqlite3.connect(db) as c:
    rows = {t: c.execute(f"select count(*) from {t}").fetchone()[0] for t in ("studies", "region_volumes", "jobs")}
  return files, rows


def _mask_volumes(path, regions):
  img = nib.load(path)
  lab = np.asarray(img.dataobj)
  vox = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
  return {name: (int(np.isin(lab, labs).sum()), int(np.isin(lab, labs).sum()) * vox) for name, labs in regions}


def test_upload_job_result_and_database(env, server):
  run, folder = env
  app, client, data_dir, db = server
  info = client.get("/api/info").get_json()
  assert info["modalities"] == ["flair", "t1", "t1ce", "t2"] and info["in_channels"] == 4
  assert info["regions"] == ["necrotic", "edema", "enhancing", "WT", "TC", "ET"]

  sid = _upload_and_wait(app, client, "P-001", _files(modality_files(folder)))
  st = client.get(f"/api/studies/{sid}").get_json()
  assert st["patient_id"] == "P-001" and st["modalities"] == ["flair", "t1", "t1ce", "t2"]
  assert st["shape"] == [16, 32, 32] and st["spacing"] == [2.0, 1.0, 1.0]  # (z, y, x), mm

  # the stored mask is exactly infer's result on the same input (same reader, same model)
  mask_path = os.path.join(data_dir, "studies", sid, "mask.nii.gz")
  inp = infer.load_input(folder)
  want = infer.to_file_labels(infer.segment(run, inp), run, inp.kind)
  saved = nib.load(mask_path)
  assert np.array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0), want)
  flair = nib.load(modality_files(folder)[0])
  assert np.allclose(saved.affine, flair.affine) and saved.get_data_dtype() == np.uint8

  # region volumes: API == DB rows == numpy on the saved mask with its voxel spacing
  regions = [(v["region"], v["labels"]) for v in st["volumes"]]
  assert regions == [("necrotic", [1]), ("edema", [2]), ("enhancing", [4]), ("WT", [1, 2, 4]),
                      ("TC", [1, 4]), ("ET", [4])]
  ref = _mask_volumes(mask_path, regions)
  for v in st["volumes"]:
    assert v["voxels"] == ref[v["region"]][0]
    assert v["cm3"] == pytest.approx(ref[v["region"]][1], rel=1e-9)
  assert sum(v["voxels"] for v in st["volumes"][:3]) == st["volumes"][3]["voxels"]  # WT = 1 + 2 + 4
  with sqlite3.connect(db) as c:
    rows = c.execute("select region, voxels, cm3 from region_volumes where study_id = ? order by position",
                     (sid,)).fetchall()
    srow = c.execute("select patient_id, shape, spacing from studies where id = ?", (sid,)).fetchone()
  assert [(r, n, pytest.approx(cm)) for r, n, cm in rows] == [(v["region"], v["voxels"], v["cm3"])
                                                              for v in st["volumes"]]
  assert srow[0] == "P-001" and json.loads(srow[1]) == st["shape"] and json.loads(srow[2]) == st["spacing"]
  listed = client.get("/api/studies").get_json()["studies"]
  assert [s["id"] for s in listed] == [sid] and listed[0] == st

  # slices: what the page draws comes from the stored arrays, in array order
  img = np.load(os.path.join(data_dir, "studies", sid, "image_u8.npy"))
  cls = np.load(os.path.join(data_dir, "studies", sid, "classes.npy"))
  assert img.shape == (16, 32, 32, 4) and cls.shape == (16, 32, 32)
  assert np.array_equal(np.array([0, 1, 2, 4])[cls], want)  # classes 0..3 <-> BraTS file labels
  for plane, idx, shape, ref_sl in (("axial", 7, (32, 32), img[7, :, :, 1]),
                                    ("coronal", 3, (16, 32), img[:, 3, :, 1]),
                                    ("sagittal", 30, (16, 32), img[:, :, 30, 1])):
    r = client.get(f"/api/studies/{sid}/image/{plane}/{idx}?channel=1")
    assert r.status_code == 200 and r.headers["X-Shape"] == "%d,%d" % shape
    assert np.array_equal(np.frombuffer(r.data, np.uint8).reshape(shape), ref_sl)
  r = client.get(f"/api/studies/{sid}/mask/coronal/16")
  assert np.array_equal(np.frombuffer(r.data, np.uint8).reshape(16, 32), cls[:, 16, :])
  assert client.get(f"/api/studies/{sid}/mask/axial/3?format=png").data[:4] == b"\x89PNG"
  assert client.get(f"/api/studies/{sid}/image/axial/16").status_code == 400  # z in 0..15
  assert client.get(f"/api/studies/{sid}/image/oblique/1").status_code == 400
  assert client.get(f"/api/studies/{sid}/image/axial/1?channel=4").status_code == 400
  assert client.get(f"/api/studies/{'0' * 32}").status_code == 404
  assert client.get(f"/api/studies/{sid}/mask.nii.gz").data[:2] == b"\x1f\x8b"


def test_four_channel_nifti_and_zip_uploads_give_the_same_mask(env, server, tmp_path):
  run, folder = env
  app, client, data_dir, db = server
  imgs = [nib.load(p) for p in modality_files(folder)]
  four = nib.Nifti1Image(np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1).astype(np.float32),
                         imgs[0].affine)
  p4 = str(tmp_path / "anything.nii.gz")
  nib.save(four, p4)
  zpath = str(tmp_path / "study.zip")
  with zipfile.ZipFile(zpath, "w") as z:
    for p in modality_files(folder):
      z.write(p, "some/folder/" + os.path.basename(p))
  ids = [_upload_and_wait(app, client, "P-002", _files([p4])),
         _upload_and_wait(app, client, "P-002", _files([zpath]))]
  first = client.get("/api/studies?patient=P-001").get_json()["studies"][0]["id"]
  masks = [np.asarray(nib.load(os.path.join(data_dir, "studies", i, "mask.nii.gz")).dataobj)
           for i in [first] + ids]
  assert all(np.array_equal(masks[0], m) for m in masks[1:])
  found = client.get("/api/studies?patient=002").get_json()["studies"]
  assert sorted(s["id"] for s in found) == sorted(ids)
  assert client.get("/api/studies?patient=%25").get_json()["studies"] == []  # '%' is literal


def test_bad_uploads_are_refused_and_nothing_is_stored(env, server, tmp_path):
  run, folder = env
  app, client, data_dir, db = server
  before = _snapshot(data_dir, db)
  mods = modality_files(folder)
  flair = open(mods[0], "rb").read()
  # truncated NIfTI, as one file and as one of the four modalities
  raw = nib.load(mods[0])
  trunc = tmp_path / "trunc.nii"
  nib.save(nib.Nifti1Image(np.stack([np.asarray(nib.load(p).dataobj) for p in mods], -1), raw.affine), trunc)
  cases = {
      "truncated 4-channel NIfTI": (_post(client, "X", [(io.BytesIO(trunc.read_bytes()[:20000]), "a.nii")]),
                                    422, "cannot read"),
      "truncated gzip modality": (_post(client, "X", [(io.BytesIO(flair[: len(flair) // 2]), "f.nii.gz")]
                                        + _files(mods[1:])), 422, "upload_flair"),
      "wrong modality count": (_post(client, "X", _files(mods[:3])), 400, "wrong modality count"),
      "one channel for a 4-channel model": (_post(client, "X", _files(mods[:1])), 422,
                                            "wrong modality count: the upload has 1 channel"),
      "not an image": (_post(client, "X", [(io.BytesIO(b"hello" * 100), "x.nii.gz")]), 400,
                       "unrecognised file"),
      "no patient id": (_post(client, None, _files(mods)), 400, "patient id is required"),
      "control chars in patient id": (_post(client, "a\nb", _files(mods)), 400, "printable"),
      "no file": (_post(client, "X", []), 400, "no file uploaded"),
  }
  evil = tmp_path / "evil.zip"
  with zipfile.ZipFile(evil, "w") as z:
    z.write(mods[0], "../../escaped_flair.nii.gz")
    for p in mods[1:]:
      z.write(p, os.path.basename(p))
  cases["zip with a traversal path"] = (_post(client, "X", _files([str(evil)])), 400, "unsafe path")
  absolute = tmp_path / "abs.zip"
  with zipfile.ZipFile(absolute, "w") as z:
    z.writestr("/etc/x_flair.nii.gz", flair)
  cases["zip with an absolute path"] = (_post(client, "X", _files([str(absolute)])), 400, "unsafe path")
  mixed = tmp_path / "three.zip"
  with zipfile.ZipFile(mixed, "w") as z:
    for p in mods[:3]:
      z.write(p, os.path.basename(p))
    z.writestr("notes_seg.nii.gz", flair)  # a _seg file is ignored, so 3 modalities remain
  cases["zip with three modalities"] = (_post(client, "X", _files([str(mixed)])), 422, "missing modality 't2'")
  for name, (r, status, text) in cases.items():
    body = r.get_json()
    assert r.status_code == status, (name, r.status_code, body)
    assert set(body) == {"error"} and text in body["error"], (name, body)
    assert "/tmp" not in body["error"] and "Traceback" not in body["error"], (name, body)
  assert not (tmp_path.parent / "escaped_flair.nii.gz").exists()
  assert _snapshot(data_dir, db) == before


def test_size_limits_413(env, tmp_path):
  run, folder = env
  app = serve.create_app(run=run, db_url=f"sqlite:///{tmp_path}/r.db", data_dir=str(tmp_path / "d"),
                         max_upload_mb=0.02, max_unzipped_mb=1)
  client = app.test_client()
  try:
    before = _snapshot(str(tmp_path / "d"), str(tmp_path / "r.db"))
    r = _post(client, "X", [(io.BytesIO(os.urandom(30000)), "big.nii.gz")])
    assert r.status_code == 413 and "upload too large: the limit is 0.02 MB" in r.get_json()["error"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
      z.writestr("a_flair.nii", b"\0" * (3 << 20))  # 3 MB of zeros, a few KB compressed
    r = _post(client, "X", [(io.BytesIO(bomb.getvalue()), "bomb.zip")])
    assert r.status_code == 413 and "limit for uncompressed data" in r.get_json()["error"], r.get_json()
    # a NIfTI header announcing a volume beyond the limit is refused before its voxels are read
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    huge.header.set_data_shape((200, 200, 200))
    hb = io.BytesIO()
    hb.write(huge.header.binaryblock + b"\0" * 4)
    r = _post(client, "X", [(io.BytesIO(hb.getvalue()), "h.nii")])
    assert r.status_code == 413 and "over the 1 MB limit" in r.get_json()["error"], r.get_json()
    assert _snapshot(str(tmp_path / "d"), str(tmp_path / "r.db")) == before
  finally:
    app.extensions["fedjax_seg"].close()


def test_failed_job_stores_nothing(env, server, monkeypatch):
  run, folder = env
  app, client, data_dir, db = server
  files, rows = _snapshot(data_dir, db)

  def boom(*a, **k):
    raise RuntimeError("simulated inference failure")
  monkeypatch.setattr(infer, "segment", boom)
  r = _post(client, "P-fail", _files(modality_files(folder)))
  assert r.status_code == 202
  j = app.extensions["fedjax_seg"].wait(r.get_json()["job"]["id"])
  assert j["status"] == "failed" and j["error"] == "RuntimeError: simulated inference failure"
  assert j["study_id"] is None
  assert _snapshot(data_dir, db) == (files, dict(rows, jobs=rows["jobs"] + 1))  # only the job row
  assert client.get("/api/studies?patient=P-fail").get_json()["studies"] == []


def test_lgg_tiff_zip(data_cache, tmp_path):
  """A Kaggle LGG patient folder as a zip (nested folder, masks and junk inside) on an LGG run."""
  wd = lgg_run(str(tmp_path / "run"), data_cache)
  run = infer.load_run(wd)
  folder = lgg_patient(str(tmp_path / "phantom"))
  zpath = tmp_path / "patient.zip"
  with zipfile.ZipFile(zpath, "w") as z:
    for n in sorted(os.listdir(folder)):
      z.write(os.path.join(folder, n), "TCGA_x/" + n)
    z.writestr("__MACOSX/._junk.tif", b"junk")
  app = serve.create_app(run=run, db_url=f"sqlite:///{tmp_path}/r.db", data_dir=str(tmp_path / "d"))
  try:
    client = app.test_client()
    assert client.get("/api/info").get_json()["regions"] == ["tumour"]
    sid = _upload_and_wait(app, client, "LGG-1", _files([str(zpath)]))
    st = client.get(f"/api/studies/{sid}").get_json()
    inp = infer.load_input(folder)
    want = infer.to_file_labels(infer.segment(run, inp), run, inp.kind)  # slices in the training order
    assert st["shape"] == list(want.shape) and st["kind"] == "tiff" and st["spacing"] == [1.0, 1.0, 1.0]
    saved = np.asarray(nib.load(str(tmp_path / "d" / "studies" / sid / "mask.nii.gz")).dataobj)
    assert np.array_equal(saved.transpose(2, 1, 0), want)
    assert st["volumes"] == [{"region": "tumour", "labels": [255], "voxels": int((want == 255).sum()),
                              "cm3": pytest.approx(int((want == 255).sum()) / 1000.0)}]
    assert st["modalities"] == ["pre-contrast", "FLAIR", "post-contrast"]
    # a single slice works too; a 4-channel BraTS-style NIfTI does not fit this model
    one = sorted(p for p in os.listdir(folder) if not p.endswith("_mask.tif"))[0]
    _upload_and_wait(app, client, "LGG-2", _files([os.path.join(folder, one)]))
  finally:
    app.extensions["fedjax_seg"].close()


def test_restart_keeps_every_study(env, server):
  run, folder = env
  app, client, data_dir, db = server
  studies = client.get("/api/studies").get_json()["studies"]
  assert len(studies) >= 3
  sl = {s["id"]: client.get(f"/api/studies/{s['id']}/mask/axial/8").data for s in studies}
  app2 = serve.create_app(run=run, db_url="sqlite:///" + db, data_dir=data_dir)
  try:
    c2 = app2.test_client()
    assert c2.get("/api/studies").get_json()["studies"] == studies
    for s in studies:
      assert c2.get(f"/api/studies/{s['id']}").get_json() == s
      assert c2.get(f"/api/studies/{s['id']}/mask/axial/8").data == sl[s["id"]]
  finally:
    app2.extensions["fedjax_seg"].close()


def test_page_privacy_defaults(server, monkeypatch):
  app, client, _, _ = server
  r = client.get("/")
  assert r.status_code == 200 and b'<script src="/static/viewer.js">' in r.data
  assert "default-src 'self'" in r.headers["Content-Security-Policy"]
  static = os.path.join(os.path.dirname(serve.__file__), "static")
  for name in ("index.html", "viewer.js", "viewer.css"):
    text = open(os.path.join(static, name)).read()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name  # no external assets
    if name == "viewer.js":
      assert "innerHTML" not in text and "insertAdjacentHTML" not in text  # server text only as text
  # binds to 127.0.0.1 unless told otherwise
  seen = {}
  import werkzeug.serving
  monkeypatch.setattr(werkzeug.serving, "run_simple", lambda host, port, app, **kw: seen.update(host=host, port=port))
  monkeypatch.setattr(serve, "create_app", lambda *a, **k: app)
  assert serve.main(["--workdir", "unused"]) == 0
  assert seen == {"host": "127.0.0.1", "port": 8000}


def test_job_unfinished_at_restart_is_marked_failed(env, tmp_path):
  run, folder = env
  kw = dict(run=run, db_url=f"sqlite:///{tmp_path}/r.db", data_dir=str(tmp_path / "d"))
  app = serve.create_app(start_worker=False, **kw)  # accepts uploads, never runs them
  r = _post(app.test_client(), "P-q", _files(modality_files(folder)))
  assert r.status_code == 202
  job_id = r.get_json()["job"]["id"]
  assert app.test_client().get(f"/api/jobs/{job_id}").get_json()["status"] == "queued"
  app.extensions["fedjax_seg"].close()
  app2 = serve.create_app(**kw)
  try:
    j = app2.test_client().get(f"/api/jobs/{job_id}").get_json()
    assert j["status"] == "failed" and "stopped before the job finished" in j["error"]
    assert app2.test_client().get("/api/jobs/nope").status_code == 404
  finally:
    app2.extensions["fedjax_seg"].close()
