"""python -m tinyllm.prepare: a corpus -> data/<name>-<vocab>-<hash>/ (tokenizer, bins, meta).

    python -m tinyllm.prepare                                  # the embedded pydocs corpus
    python -m tinyllm.prepare data=text data.path=FILE tokenizer.vocab_size=N out_dir=DIR
    python -m tinyllm.prepare data=shakespeare data.path=../shared/data/tinyshakespeare.txt

The work is tinyllm.data.prepare.prepare_data; this file only reads the Hydra config
(conf/prepare.yaml) and turns user mistakes into a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from tinyllm.errors import exit_on_user_error


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tinyllm.data.prepare import default_data_dir, prepare_data

    with exit_on_user_error():
        out_dir = cfg.out_dir or default_data_dir(cfg.data, cfg.tokenizer, cfg.data_root)
        path = prepare_data(cfg.data, cfg.tokenizer, out_dir, cfg.force, cfg.num_workers)
    print(path)


if __name__ == "__main__":
    from tinyllm.cli import hydra_entry

    hydra_entry(main, "prepare")
