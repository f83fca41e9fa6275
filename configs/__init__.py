"""Run configs: `--config=configs/<name>.py[:arg]`. A package so that phase configs import `configs.base`."""
