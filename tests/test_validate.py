"""Config validation (fedjax_seg/validate.py) and launch.py's one-line errors.

Every bad command of the corpus runs launch.py in this process (``launch.run_cli``)
and must exit 2 with exactly one line on stderr, ``error: ...`` naming the key (or the
flag / file), and must not create its workdir.
"""
import importlib
import os

import ml_collections
import pytest

import launch
from fedjax_seg import validate
from fedjax_seg.validate import ConfigError, Int, OneOf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDAVG = os.path.join(ROOT, "configs", "lgg_fedavg.py")
DEMO = os.path.join(ROOT, "configs", "demo.py") + ":geometric"
ACDC_CL = os.path.join(ROOT, "configs", "acdc_centralized.py")
FEDWEP = os.path.join(ROOT, "configs", "lgg_fedwep.py")


def _fedavg():
  return importlib.import_module("configs.lgg_fedavg").get_config()


# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------
def _variants(name):
  if name == "lgg_fedwep":
    methods = importlib.import_module("configs.lgg_fedwep").METHODS
    return [None] + [m for m in methods] + ["cps,label_at_server", "fedwep,label_at_client,0.5,noniid"]
  return [None, "smoke", "quick", "geometric", "anatomical", "scaunet_a"]


def test_every_shipped_config_and_variant_passes():
  checked = 0
  for f in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if not f.endswith(".py") or f == "__init__.py":
      continue
    module = importlib.import_module(f"configs.{f[:-3]}")
    for arg in _variants(f[:-3]):
      try:
        c = module.get_config(arg) if arg else module.get_config()
      except Exception:  # noqa: BLE001 - not a variant of this config
        continue
      validate.check(c)
      validate.check_unread(c)  # a shipped config sets no fl / semi key its algorithm ignores
      checked += 1
  assert checked >= 25


def test_check_unread_reads_the_algorithm_and_the_other_keys():
  c = _fedavg()
  validate.check_unread(c, dict(validate.leaves(c)))  # the file's own values: nothing set
  c.algorithm = "dcew"
  c.fl.beta, c.fl.gamma = 0.3, 0.2                      # read by dcew
  validate.check_unread(c)
  c.algorithm = "fedcostw"                              # beta is not read by fedcostw
  with pytest.raises(ConfigError, match=r"config.fl.beta=0.3: not read by config.algorithm='fedcostw'"):
    validate.check_unread(c)
  c = _fedavg()
  c.fl.server_b2 = 0.9
  with pytest.raises(ConfigError, match="server_b2"):
    validate.check_unread(c)
  c.fl.server_opt = "fedadagrad"                        # Adagrad has no β2
  with pytest.raises(ConfigError, match="server_b2"):
    validate.check_unread(c)
  c.fl.server_opt = "fedadam"
  validate.check_unread(c)
  c = _fedavg()
  c.fl.dp.clip_norm = 2.0
  with pytest.raises(ConfigError, match="fl.dp.clip_norm"):
    validate.check_unread(c)
  c.fl.dp.enabled = True
  validate.check_unread(c)
  c.fl.dp.sample_cap = 10.0                             # read with weighting='samples' only
  with pytest.raises(ConfigError, match="fl.dp.sample_cap"):
    validate.check_unread(c)
  c.fl.dp.weighting = "samples"
  validate.check_unread(c)
  # a key outside fl / semi is compared with the reference given, and unchecked without one
  c = _fedavg()
  ref = dict(validate.leaves(c))
  c.num_epochs = 3
  validate.check_unread(c)
  with pytest.raises(ConfigError, match="config.num_epochs=3"):
    validate.check_unread(c, ref)
  c.algorithm = "centralized"
  validate.check_unread(c, ref)


def test_sweep_point_setting_an_unread_key_is_refused(tmp_path):
  from fedjax_seg import sweep
  ran = []
  with pytest.raises(sweep.SweepError, match=r"sweep point .*config.fl.trim=0.2: not read"):
    sweep.run_sweep(_fedavg(), str(tmp_path / "sw"), [{"fl.trim": 0.2}],
                    run_fn=lambda *a, **k: ran.append(a))
  assert not ran


def test_message_format_is_exact():
  c = _fedavg()
  c.fl.rounds = 0
  with pytest.raises(ConfigError) as e:
    validate.check(c)
  assert str(e.value) == "config.fl.rounds=0: must be an integer >= 1"
  assert isinstance(e.value, ValueError) and e.value.key == "fl.rounds"
  c = _fedavg()
  c.fl.client_strategy = "vmapp"
  with pytest.raises(ValueError, match=r"^config\.fl\.client_strategy='vmapp': must be one of "
                                       r"'auto', 'vmap', 'unrolled', 'map', 'sharded'"):
    validate.check(c)


@pytest.mark.parametrize("key, value, why", [
    ("fl.rounds", 1.5, "must be an integer >= 1"),
    ("fl.rounds", True, "must be an integer >= 1"),
    ("optimizer.lr", float("nan"), "must be a finite number > 0"),
    ("optimizer.lr", float("inf"), "must be a finite number > 0"),
    ("model.dropout", 1.0, "must be a finite number in [0, 1)"),
    ("fl.trim", 0.5, "must be a finite number in [0, 0.5)"),
    ("data.val_fraction", 0.0, "must be a finite number in (0, 1)"),
])
def test_rule_edges(key, value, why):
  with pytest.raises(ConfigError) as e:
    validate.check(ml_collections.ConfigDict({key.split(".")[0]: {key.split(".")[1]: value}}),
                   rules={key: validate.RULES[key]})
  assert e.value.why == why


def test_keys_without_a_rule_are_accepted_and_rules_can_be_added():
  c = _fedavg()
  with c.unlocked():
    c.fl.some_future_key = -5  # no rule: accepted as is
    c.brand_new_section = ml_collections.ConfigDict({"x": "anything"})
  validate.check(c)
  rules = {**validate.RULES, "fl.some_future_key": Int(lo=0)}
  with pytest.raises(ValueError, match=r"^config\.fl\.some_future_key=-5: must be an integer >= 0$"):
    validate.check(c, rules=rules)
  assert isinstance(validate.RULES, dict)
  assert "fl.rounds" in validate.RULES and "fl.some_future_key" not in validate.RULES


def test_registry_rules_read_the_registries():
  from fedjax_seg import train
  from fedjax_seg.fl import backends
  assert set(validate.RULES["algorithm"].allowed()) == set(train.TRAINERS)
  assert validate.RULES["fl.client_strategy"].allowed() == backends.CLIENT_STRATEGIES
  assert OneOf(lambda: ("a", "b")).check("c") == "must be one of 'a', 'b'"


def test_config_utils_validate_is_the_table():
  from fedjax_seg.config_utils import validate as legacy
  c = _fedavg()
  c.fl.stats_samples = 0
  with pytest.raises(ValueError, match=r"^config\.fl\.stats_samples=0: "):
    legacy(c)


# ---------------------------------------------------------------------------
# The command-line corpus.
# ---------------------------------------------------------------------------
CASES = [
    # (id, config, overrides, text that stderr's one line must contain)
    ("rounds", FEDAVG, ["--config.fl.rounds=0"], "config.fl.rounds=0: must be an integer >= 1"),
    ("eval_every", FEDAVG, ["--config.fl.eval_every=0"], "config.fl.eval_every=0: must be an integer >= 1"),
    ("local_steps", FEDAVG, ["--config.fl.local_steps=0"], "config.fl.local_steps=0:"),
    ("client_batch", FEDAVG, ["--config.fl.client_batch_size=0"], "config.fl.client_batch_size=0:"),
    ("stats_samples", FEDAVG, ["--config.fl.stats_samples=-3"], "config.fl.stats_samples=-3:"),
    ("prox_mu", FEDAVG, ["--config.fl.prox_mu=-0.1"], "config.fl.prox_mu=-0.1: must be a finite number >= 0"),
    ("lr_zero", FEDAVG, ["--config.optimizer.lr=0"], "config.optimizer.lr=0.0: must be a finite number > 0"),
    ("lr_negative", FEDAVG, ["--config.optimizer.lr=-1e-3"], "config.optimizer.lr=-0.001:"),
    ("lr_nan", FEDAVG, ["--config.optimizer.lr=nan"], "config.optimizer.lr=nan: must be a finite number"),
    ("lr_inf", FEDAVG, ["--config.optimizer.lr=inf"], "config.optimizer.lr=inf:"),
    ("eval_batch", FEDAVG, ["--config.eval_batch_size=0"], "config.eval_batch_size=0:"),
    ("depth", FEDAVG, ["--config.model.depth=0"], "config.model.depth=0:"),
    ("base", FEDAVG, ["--config.model.base=0"], "config.model.base=0:"),
    ("dtype", FEDAVG, ["--config.model.dtype=float64"], "config.model.dtype='float64': must be one of 'float32'"),
    ("client_strategy", FEDAVG, ["--config.fl.client_strategy=vmapp"], "config.fl.client_strategy='vmapp':"),
    ("step_strategy", FEDAVG, ["--config.fl.step_strategy=loop"], "config.fl.step_strategy='loop': must be one of"),
    ("algorithm", FEDAVG, ["--config.algorithm=fedavgg"], "config.algorithm='fedavgg': must be one of"),
    ("val_fraction", FEDAVG, ["--config.data.val_fraction=0"], "config.data.val_fraction=0.0: must be a finite number in (0, 1)"),
    ("test_fraction", FEDAVG, ["--config.data.test_fraction=1"], "config.data.test_fraction=1.0:"),
    ("fractions_sum", FEDAVG, ["--config.data.val_fraction=0.6", "--config.data.test_fraction=0.5"],
     "config.data.test_fraction=0.5: config.data.val_fraction + config.data.test_fraction = 1.1"),
    ("image_size", FEDAVG, ["--config.data.image_size=60"], "config.data.image_size=60: must be divisible"),
    ("partition", FEDAVG, ["--config.fl.partition=random"], "config.fl.partition='random':"),
    ("num_clients", FEDAVG, ["--config.fl.num_clients=-1"], "config.fl.num_clients=-1:"),
    ("iid_needs_clients", FEDAVG, ["--config.fl.partition=iid"], "config.fl.num_clients=0: partition 'iid' needs"),
    ("dcew_weights", FEDAVG, ["--config.algorithm=dcew", "--config.fl.beta=0.5"], "config.fl.gamma=0.25: config.fl.alpha + beta + gamma must be 1"),
    ("server_opt", FEDAVG, ["--config.fl.server_opt=adam"], "config.fl.server_opt='adam': must be one of 'none'"),
    ("trim", FEDAVG, ["--config.fl.trim=0.5"], "config.fl.trim=0.5:"),
    ("dp_delta", FEDAVG, ["--config.fl.dp.delta=0"], "config.fl.dp.delta=0.0:"),
    ("dp_accountant", FEDAVG, ["--config.fl.dp.accountant=gdp"], "config.fl.dp.accountant='gdp':"),
    ("loss", FEDAVG, ["--config.loss=dice_bce"], "config.loss='dice_bce': must be one of"),
    ("optimizer", FEDAVG, ["--config.optimizer.name=rmsprop"], "config.optimizer.name='rmsprop':"),
    ("seed", FEDAVG, ["--config.seed=-1"], "config.seed=-1:"),
    ("layout", FEDAVG, ["--config.data.layout=nifti"], "config.data.layout='nifti': must be one of"),
    ("norm_k", FEDAVG, ["--config.fl.norm_k=-1"], "config.fl.norm_k=-1.0:"),
    ("dropout", FEDAVG, ["--config.model.dropout=1"], "config.model.dropout=1.0:"),
    ("normalize", FEDAVG, ["--config.data.normalize=minmax"], "config.data.normalize='minmax':"),
    ("secagg_bits", FEDAVG, ["--config.fl.secagg_bits=40"], "config.fl.secagg_bits=40:"),
    ("split_seed", FEDAVG, ["--config.data.split_seed=-2"], "config.data.split_seed=-2:"),
    ("chunk", FEDAVG, ["--config.fl.clients_per_chunk=-1"], "config.fl.clients_per_chunk=-1:"),
    ("batch_size_cl", DEMO, ["--config.batch_size=0"], "config.batch_size=0:"),
    ("epochs_cl", DEMO, ["--config.num_epochs=0"], "config.num_epochs=0:"),
    ("fl_section", ACDC_CL, ["--config.algorithm=fedavg"], "config.fl=None: algorithm 'fedavg' needs the fl section"),
    # overrides that do not parse, or name no key
    ("type_int", FEDAVG, ["--config.fl.rounds=abc"], "config.fl.rounds='abc': expected int"),
    ("type_float", FEDAVG, ["--config.optimizer.lr=fast"], "config.optimizer.lr='fast': expected float"),
    ("type_bool", FEDAVG, ["--config.fl.eval_clients=maybe"], "config.fl.eval_clients='maybe': expected bool"),
    ("type_int_float", FEDAVG, ["--config.fl.local_steps=2.5"], "config.fl.local_steps='2.5': expected int"),
    ("unknown_key", FEDAVG, ["--config.fl.roundz=3"], "unknown config key fl.roundz (did you mean fl.rounds?)"),
    ("unknown_section", FEDAVG, ["--config.fll.rounds=3"], "unknown config key fll.rounds (did you mean fl.rounds?)"),
    ("unknown_model_key", FEDAVG, ["--config.model.dtyp=bfloat16"], "unknown config key model.dtyp (did you mean model.dtype?)"),
    ("unknown_no_hint", FEDAVG, ["--config.zzzzzz=1"], "unknown config key zzzzzz"),
    ("unknown_flag", FEDAVG, ["--workdirr=x"], "workdirr"),
    # keys the chosen algorithm does not read (validate.READ_BY)
    ("unread_alpha", FEDAVG, ["--config.fl.alpha=0.7"],
     "config.fl.alpha=0.7: not read by config.algorithm='fedavg' with these settings (read by fedcostw, costw_ce, dcew); leave it at 0.5"),
    ("unread_num_epochs", FEDAVG, ["--config.num_epochs=3"], "config.num_epochs=3: not read by config.algorithm='fedavg'"),
    ("unread_server_lr", FEDAVG, ["--config.fl.server_lr=0.5"], "config.fl.server_lr=0.5: not read"),
    ("unread_dp_clip", FEDAVG, ["--config.fl.dp.clip_norm=2.0"], "(read by fl.dp.enabled=True)"),
    ("unread_augment", FEDAVG, ["--config.augment.flip=True"], "config.augment.flip=True: not read"),
    ("unread_mt", FEDWEP, ["--config.semi.mt.ema_decay=0.9"], "(read by mean_teacher)"),
    ("unread_fl_on_centralized", FEDAVG, ["--config.algorithm=centralized", "--config.fl.rounds=3"],
     "config.fl.rounds=3: not read by config.algorithm='centralized'"),
    ("extra_argument", FEDAVG, ["stray"], "unexpected arguments: stray"),
]


def _run(capfd, args):
  rc = launch.run_cli(["launch.py", *args])
  out, err = capfd.readouterr()
  return rc, out, err


@pytest.mark.parametrize("name, config, overrides, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_command_is_one_line_exit_2(name, config, overrides, needle, tmp_path, capfd):
  wd = tmp_path / "run"
  rc, out, err = _run(capfd, ["--config", config, "--workdir", str(wd), *overrides])
  lines = err.splitlines()
  assert rc == 2, (out, err)
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
  if name == "unknown_key":
    assert lines[0] == "error: unknown config key fl.roundz (did you mean fl.rounds?)"
  assert not wd.exists()


def test_missing_config_file_and_workdir(tmp_path, capfd):
  rc, _, err = _run(capfd, ["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")])
  assert rc == 2 and err.splitlines() == [f"error: --config={tmp_path / 'nope.py'}: no such config file"]
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  rc, _, err = _run(capfd, ["--config", str(broken), "--workdir", str(tmp_path / "w")])
  assert rc == 2 and len(err.splitlines()) == 1 and "broken.py: cannot load it (SyntaxError" in err
  rc, _, err = _run(capfd, ["--config", FEDAVG])
  assert rc == 2 and err.splitlines() == ["error: --workdir is required"]
  assert not (tmp_path / "w").exists()


def test_run_cli_parses_afresh_each_time(tmp_path, capfd):
  """An override of one in-process command does not leak into the next one."""
  assert _run(capfd, ["--config", FEDAVG, "--workdir", str(tmp_path / "a"), "--config.fl.rounds=0"])[0] == 2
  rc, _, err = _run(capfd, ["--config", FEDAVG, "--workdir", str(tmp_path / "b"), "--config.fl.eval_every=0"])
  assert rc == 2 and err.splitlines() == ["error: config.fl.eval_every=0: must be an integer >= 1"]


def test_anatomical_phantom_without_the_template_is_one_line(tmp_path, capfd, monkeypatch):
  """A plain `pip install .` has no ICBM152 template: refused before anything is written."""
  from fedjax_seg.data import anatomy

  def missing():
    raise anatomy.TemplateUnavailable("nilearn is not installed: pip install -e '.[anatomy]'")
  monkeypatch.setattr(anatomy, "template_dir", missing)
  wd = tmp_path / "run"
  demo = os.path.join(ROOT, "configs", "demo.py") + ":anatomical"
  rc, _, err = _run(capfd, ["--config", demo, "--workdir", str(wd)])
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("error: config.data.phantom.style='anatomical': nilearn is not installed")
  assert "--config.data.phantom.style=geometric" in err
  assert not wd.exists()
  # the demo's default follows what is installed (config.json records it)
  monkeypatch.setattr(anatomy, "available", lambda: False)
  assert importlib.import_module("configs.demo").get_config().data.phantom.style == "geometric"
  monkeypatch.setattr(anatomy, "available", lambda: True)
  assert importlib.import_module("configs.demo").get_config().data.phantom.style == "anatomical"


def test_a_run_failing_before_training_leaves_no_workdir(tmp_path, capfd, monkeypatch):
  """Data that fails to build after validation (here: the phantom writer raising) removes
  the workdir the run created; an existing workdir is left alone."""
  from fedjax_seg.data import pipeline

  def broken(*a, **k):
    raise ValueError("phantom writer failed")
  monkeypatch.setattr(pipeline, "build_dataset", broken)
  wd = tmp_path / "run"
  rc, _, err = _run(capfd, ["--config", DEMO, "--workdir", str(wd), "--config.data.cache_dir",
                            str(tmp_path / "cache")])
  assert rc == 2 and err.strip() == "error: phantom writer failed", err
  assert not wd.exists()
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  rc, _, _ = _run(capfd, ["--config", DEMO, "--workdir", str(wd)])
  assert rc == 2 and (wd / "notes.txt").read_text() == "mine"


def test_config_by_name_and_help_lists_the_configs(tmp_path, capfd):
  """`--config demo:geometric` means configs/demo.py:geometric; --help names every config."""
  rc, _, err = _run(capfd, ["--config", "demo:geometric", "--workdir", str(tmp_path / "w"),
                            "--config.num_epochs=0"])
  assert rc == 2 and err.splitlines() == ["error: config.num_epochs=0: must be an integer >= 1"]
  assert "lgg_fedavg" in launch.available_configs() and "common" not in launch.available_configs()
  assert "demo, lgg_centralized" in launch.__doc__ or "demo," in launch.__doc__
