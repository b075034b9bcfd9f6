"""``python -m moei_lightning fit --config conf/tiny.yaml``."""

from moei_lightning.cli import main

main()
