"""What every layer shares, below the data pipeline: nothing here knows frames, shards or models.

    errors.py   UserError, run_cli, check_output_dir: a user's mistake is one `error:` line and exit 2
    device.py   resolve_device: the one rule for which device a command runs on
    cli.py      a command line built from a config dataclass: one flag per field, its range checked
    distributed.py  ranks under torchrun: process group, barrier, gathering, shares of a list

Imports run one way: common <- pipeline <- model <- evaluation <- training, control <- scripts.
"""
