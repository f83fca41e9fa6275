"""Command lines: a bad flag or `--config.` override is one line naming it (tests/test_main.py runs the entry
point with them: exit status, timing, workdir)."""

from absl import flags

from mmbert_jax import cli


def test_bad_overrides_are_one_line():
  """The messages for the errors absl and ml_collections raise."""
  argv = ["main", "--config=configs/demo.py", "--config.data.tua=5", "--config.train_tokenz=5"]
  unknown = AttributeError(KeyError('\'train_tokenz\'\nDid you mean "train_tokens" instead of "train_tokenz"?'))
  assert cli.flag_error(unknown, argv) == (
    "--config.train_tokenz: the config has no key 'train_tokenz' (did you mean train_tokens instead of train_tokenz?)"
  )
  assert cli.flag_error(KeyError("'tua'"), argv) == "--config.data.tua: the config has no key 'tua'"
  assert cli.flag_error(flags.UnrecognizedFlagError("config.data.budgets", "5"), argv) == (
    "--config.data.budgets: the config has no value 'budgets' to set (a section is set key by key)"
  )
  bad_value = flags.IllegalFlagValueError(
    "flag --config.batch_size=many: invalid literal for int() with base 10: 'many'"
  )
  assert cli.flag_error(bad_value, argv) == (
    "flag --config.batch_size=many: invalid literal for int() with base 10: 'many'"
  )
  bad_file = flags.IllegalFlagValueError(
    "flag --config=configs/decay.py:hot: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
    '  File "configs/decay.py", line 30, in get_config\n    raise ValueError(...)\n'
    "ValueError: configs/decay.py: variant 'hot' is not one of ['all', 'cont', 'eng']\n"
  )
  assert cli.flag_error(bad_file, argv) == (
    "flag --config=configs/decay.py:hot: Error whilst parsing config file: ValueError: configs/decay.py: variant "
    "'hot' is not one of ['all', 'cont', 'eng']"
  )
