"""fedjax_seg.serve in a real browser: headless Debian Chromium driven by Selenium against
a real server on a free localhost port.

Uploads a phantom BraTS study through the page's form (after a refused one), waits for the
segmentation, checks the patient id is shown as text, moves a slider, clicks a plane, switches
the modality, toggles the overlay and takes a screenshot.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`; `.ci/run`
installs them); the driver path is passed to Selenium, so Selenium Manager never downloads
anything. Without them the test is skipped, except under CI=true where it fails.
``FEDJAX_SEG_UPDATE_SCREENSHOT=1`` writes the screenshot to docs/img/viewer.png (else to a temp
folder); ``FEDJAX_SEG_SCREENSHOT_RUN=RUN`` uses a trained BraTS run instead of the untrained one.
"""
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest

from fedjax_seg import infer, serve

from _serve_common import brats_patient, brats_run, modality_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("FEDJAX_SEG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FEDJAX_SEG_CHROMEDRIVER", "/usr/bin/chromedriver")
XSS_ID = '<script>__pwned=1</script><img src=x onerror=__pwned=2>P-7'  # 58 chars (limit 64)


def _need(ok, why):
  if ok:
    return
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"CI=true but {why} (.ci/run installs chromium and chromium-driver with apt-get)")
  pytest.skip(f"{why}: install Debian's chromium and chromium-driver (apt-get install chromium "
              f"chromium-driver) to run the browser test")


@pytest.fixture(scope="module")
def browser():
  _need(os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER),
        f"no {CHROMIUM} / {CHROMEDRIVER}")
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    _need(False, "selenium is not installed (pip install -e '.[test]')")
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1400,860", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
            "--force-device-scale-factor=1"):
    opts.add_argument(a)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
  """(base URL, app, patient folder): the viewer on 127.0.0.1:<free port> in a thread."""
  from werkzeug.serving import make_server
  trained = os.environ.get("FEDJAX_SEG_SCREENSHOT_RUN")
  if trained:
    run = infer.load_run(trained)
    from fedjax_seg.data import phantom
    size = int(run.config.data.phantom.size)
    folder = phantom.write_brats(str(tmp_path_factory.mktemp("phantom")), seed=7, sites=("CS",),
                                 patients_per_site=1, size=size,
                                 slices_per_patient=int(run.config.data.phantom.slices_per_patient),
                                 tumour_free_fraction=0.0)[0]
  else:
    run = infer.load_run(brats_run(str(tmp_path_factory.mktemp("browser_run"))))
    folder = brats_patient(str(tmp_path_factory.mktemp("browser_phantom")))
  root = tmp_path_factory.mktemp("browser_data")
  app = serve.create_app(run=run, db_url=f"sqlite:///{root}/results.db", data_dir=str(root / "data"))
  srv = make_server("127.0.0.1", 0, app, threaded=True)
  t = threading.Thread(target=srv.serve_forever, daemon=True)
  t.start()
  yield f"http://127.0.0.1:{srv.server_port}", app, folder, root
  srv.shutdown()
  t.join(10)
  app.extensions["fedjax_seg"].close()


def _coloured(driver):
  """Pixels of the three canvases tinted by an overlay colour (blue, green or red dominant; the grey
  image has equal channels, the yellow crosshair has R ~ G > B)."""
  return driver.execute_script("""
    let n = 0;
    for (const p of ['axial', 'coronal', 'sagittal']) {
      const c = document.getElementById('view-' + p);
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4)
        { const r = d[i], g = d[i + 1], b = d[i + 2];
          if ((b > r + 8 && b > g + 8) || (g > r + 8 && g > b + 8) || (r > g + 8 && Math.abs(g - b) <= 8)) n++; }
    }
    return n;""")


def _canvas_sum(driver, plane):
  return driver.execute_script(f"""
    const c = document.getElementById('view-{plane}');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let s = 0; for (let i = 0; i < d.length; i++) s += d[i] * ((i % 97) + 1); return s;""")


def _redrawn(driver, before, timeout=20):
  from selenium.webdriver.support.ui import WebDriverWait
  WebDriverWait(driver, timeout).until(
      lambda d: int(d.execute_script("return document.body.dataset.drawn || 0")) > before)


def test_upload_view_and_screenshot(browser, live, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import Select, WebDriverWait
  url, app, folder, root = live
  d = browser
  t0 = time.monotonic()
  d.get(url + "/")
  WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
  assert "flair" in d.find_element(By.ID, "run-info").text

  # a refused upload: the server's message is shown in the page, nothing is stored
  bad = tmp_path / "bad.nii.gz"
  bad.write_bytes(b"not a nifti" * 50)
  d.find_element(By.ID, "patient-id").send_keys("BAD")
  d.find_element(By.ID, "single-file").send_keys(str(bad))
  d.find_element(By.ID, "upload-btn").click()
  err = d.find_element(By.ID, "upload-error")
  WebDriverWait(d, 30).until(lambda _: err.is_displayed() and err.text)
  assert "unrecognised file" in err.text
  assert app.extensions["fedjax_seg"].studies() == []
  d.execute_script("document.getElementById('single-file').value = '';")

  # the real upload: one NIfTI per modality through the form
  pid = d.find_element(By.ID, "patient-id")
  pid.clear()
  pid.send_keys(XSS_ID)
  for m, p in zip(("flair", "t1", "t1ce", "t2"), modality_files(folder)):
    d.find_element(By.ID, "file-" + m).send_keys(p)
  d.find_element(By.ID, "upload-btn").click()
  progress_seen = set()
  deadline = time.monotonic() + 300
  while not d.execute_script("return document.body.dataset.study"):
    assert time.monotonic() < deadline, "no result within 300 s"
    assert not d.find_element(By.ID, "upload-error").is_displayed(), d.find_element(By.ID, "upload-error").text
    progress_seen.add(d.execute_script("return document.getElementById('job-progress').value"))
    time.sleep(0.1)
  WebDriverWait(d, 20).until(lambda d: "done" in d.find_element(By.ID, "job-status").text)
  assert d.find_element(By.ID, "job-status").text == "done (100 %)"
  assert d.execute_script("return document.getElementById('job-progress').value") == 1
  studies = app.extensions["fedjax_seg"].studies()
  assert len(studies) == 1
  st = studies[0]

  # the patient id is text everywhere: nothing of it ran or became markup
  assert d.execute_script("return window.__pwned === undefined")
  assert d.execute_script("return document.querySelectorAll('#study-list script, #study-list img, "
                          "#study-title script, #study-title img').length") == 0
  assert d.find_element(By.CSS_SELECTOR, "#study-list td.patient").text == XSS_ID
  assert XSS_ID in d.find_element(By.ID, "study-title").text
  rows = [r.text.split() for r in d.find_elements(By.CSS_SELECTOR, "#volume-rows tr")]
  assert [r[0] for r in rows] == [v["region"] for v in st["volumes"]]
  assert [int(r[-1]) for r in rows] == [v["voxels"] for v in st["volumes"]]  # the DB's numbers

  # move the axial slider with the keyboard: the axial plane is redrawn at the new z
  focus = st["focus"]
  slider = d.find_element(By.ID, "slider-axial")
  before, drawn = _canvas_sum(d, "axial"), int(d.execute_script("return document.body.dataset.drawn"))
  steps = -3 if focus[0] >= 3 else 3
  for _ in range(abs(steps)):
    slider.send_keys(Keys.ARROW_LEFT if steps < 0 else Keys.ARROW_RIGHT)
  _redrawn(d, drawn)
  WebDriverWait(d, 10).until(lambda d: d.find_element(By.ID, "pos-axial").text.startswith(f"z = {focus[0] + steps} "))
  assert _canvas_sum(d, "axial") != before
  # click the axial plane near its top-left quarter: coronal and sagittal planes follow
  cv = d.find_element(By.ID, "view-axial")
  drawn = int(d.execute_script("return document.body.dataset.drawn"))
  w, h = cv.size["width"], cv.size["height"]
  ActionChains(d).move_to_element_with_offset(cv, -w // 4, -h // 4).click().perform()
  _redrawn(d, drawn)
  y, x = st["shape"][1], st["shape"][2]
  want_y, want_x = int((h / 4) / h * y), int((w / 4) / w * x)
  cor = int(d.find_element(By.ID, "slider-coronal").get_attribute("value"))
  sag = int(d.find_element(By.ID, "slider-sagittal").get_attribute("value"))
  assert abs(cor - want_y) <= 1 and abs(sag - want_x) <= 1, (cor, sag, want_y, want_x)
  # back to the tumour for the rest
  d.execute_script("""for (const [p, v] of [['axial', arguments[0]], ['coronal', arguments[1]],
                                            ['sagittal', arguments[2]]]) {
      const s = document.getElementById('slider-' + p); s.value = v;
      s.dispatchEvent(new Event('input')); }""", *focus)
  time.sleep(0.5)

  # modality switch changes the image
  before, drawn = _canvas_sum(d, "sagittal"), int(d.execute_script("return document.body.dataset.drawn"))
  Select(d.find_element(By.ID, "modality")).select_by_visible_text("t1ce")
  _redrawn(d, drawn)
  assert _canvas_sum(d, "sagittal") != before

  # overlay on / off
  with_overlay = _coloured(d)
  drawn = int(d.execute_script("return document.body.dataset.drawn"))
  d.find_element(By.ID, "overlay").click()
  _redrawn(d, drawn)
  assert with_overlay > 0 and _coloured(d) == 0
  drawn = int(d.execute_script("return document.body.dataset.drawn"))
  d.find_element(By.ID, "overlay").click()
  _redrawn(d, drawn)
  assert _coloured(d) == with_overlay
  Select(d.find_element(By.ID, "modality")).select_by_visible_text("flair")
  time.sleep(0.5)

  # search by patient id
  search = d.find_element(By.ID, "search")
  search.send_keys("nobody")
  WebDriverWait(d, 10).until(lambda d: "no study matches" in d.find_element(By.ID, "study-list").text)
  search.clear()
  search.send_keys("P-7")
  WebDriverWait(d, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#study-list td.patient"))

  # no console errors (a CSP violation or a failed request would show here)
  severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "bad.nii.gz" not in e["message"]
            and "/api/studies - Failed to load resource" not in e["message"]]
  assert not severe, severe

  # screenshot: docs/img/viewer.png when asked to update it, else a temp file
  png = d.get_screenshot_as_png()
  from PIL import Image
  im = Image.open(io.BytesIO(png)).convert("RGB")
  out = (os.path.join(ROOT, "docs", "img", "viewer.png") if os.environ.get("FEDJAX_SEG_UPDATE_SCREENSHOT") == "1"
         else str(tmp_path / "viewer.png"))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)  # small PNG
  assert os.path.getsize(out) < 200_000
  assert np.asarray(im).std() > 10  # not a blank page
  print(f"\n[browser] screenshot {out} ({os.path.getsize(out) // 1024} KB); {time.monotonic() - t0:.1f} s; "
        f"progress values seen {sorted(progress_seen)}")


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
  monkeypatch.delenv("CI", raising=False)
  with pytest.raises(pytest.skip.Exception, match="install Debian's chromium"):
    _need(False, "no /usr/bin/chromium")
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="CI=true but no /usr/bin/chromium"):
    _need(False, "no /usr/bin/chromium")
  _need(True, "unused")
