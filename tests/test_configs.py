"""conf/ as deltas over the code: every config parses, `base:` files merge beneath a config, each key says
something the code or a base does not, no comment is repeated, and the README's table is the code's."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

from moei_lightning import config_reference
from moei_lightning.cli import main
from moei_lightning.config_parser import BASE_KEY, resolve_bases
from moei_lightning.errors import ConfigError
from tests.conftest import REPO

CONF = REPO / "conf"
ENTRY_CONFIGS = sorted(p for p in CONF.glob("*.yaml"))
OVERLAYS = sorted([*CONF.glob("strategy/*.yaml"), *CONF.glob("eval/*.yaml")])


def print_config(capsys: pytest.CaptureFixture, *configs: Path, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit", *(a for c in configs for a in ("--config", str(c))), *extra, "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    printed.pop("config", None)
    return printed


@pytest.mark.parametrize("config", ENTRY_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_with_print_config(config: Path, capsys: pytest.CaptureFixture) -> None:
    printed = print_config(capsys, config)
    assert BASE_KEY not in printed
    assert printed["model"]["molora"]["num_experts"] >= 1  # the dataclass sections list every field
    assert set(printed["model"]["backbone"]) >= {"name_or_path", "kind", "dtype"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_overlay_composes_onto_a_model_config(overlay: Path, capsys: pytest.CaptureFixture) -> None:
    printed = print_config(capsys, CONF / "llama2-13b.yaml", overlay)
    own = yaml.safe_load(overlay.read_text())
    if "eval" in own:
        assert printed["eval"]["suites"] == own["eval"]["suites"]
    else:
        assert printed["trainer"]["strategy"]["class_path"] == own["trainer"]["strategy"]["class_path"]


def test_base_is_the_same_as_giving_the_files_in_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """conf/llama2-13b.yaml == --config base/gpu.yaml --config base/llama2.yaml --config llama2-13b.yaml."""
    chain = [CONF / "base" / "gpu.yaml", CONF / "base" / "llama2.yaml", CONF / "llama2-13b.yaml"]
    copies = []
    for path in chain:
        copy = tmp_path / path.name
        text = yaml.safe_load(path.read_text())
        text.pop(BASE_KEY, None)
        copy.write_text(yaml.safe_dump(text, sort_keys=False))
        copies.append(copy)
    assert print_config(capsys, CONF / "llama2-13b.yaml") == print_config(capsys, *copies)


def test_bases_apply_in_order_relative_to_the_file_that_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "first.yaml").write_text(
        "base: ../root.yaml\nmodel:\n  lambda_bal: 0.1\n  molora:\n    rank: 4\n"
    )
    (tmp_path / "shared" / "second.yaml").write_text("model:\n  lambda_bal: 0.2\n  lambda_gi_lm: 0.5\n")
    (tmp_path / "root.yaml").write_text("seed_everything: 7\ndata:\n  seed: ${seed_everything}\n  batch_size: 2\n")
    top = tmp_path / "experiments" / "run.yaml"
    top.parent.mkdir()
    top.write_text("base: [../shared/first.yaml, ../shared/second.yaml]\nmodel:\n  lambda_gi_lm: 0.25\n")
    printed = print_config(capsys, top, extra=("--seed_everything=9",))
    assert printed["model"]["molora"]["rank"] == 4  # from first.yaml
    assert printed["model"]["lambda_bal"] == 0.2  # second.yaml after first.yaml
    assert printed["model"]["lambda_gi_lm"] == 0.25  # the file itself after its bases
    assert printed["data"]["batch_size"] == 2  # root.yaml, two levels down
    assert printed["data"]["seed"] == 9  # interpolation resolved after the command line, as without bases


def test_a_base_with_another_class_path_replaces_the_object(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "trainer:\n  strategy:\n    class_path: moei_lightning.strategies.MoEIFSDP2Strategy\n"
        "    init_args:\n      reshard_after_forward: false\n"
    )
    (tmp_path / "b.yaml").write_text(
        "base: a.yaml\ntrainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy\n"
    )
    assert resolve_bases(tmp_path / "b.yaml")["trainer"]["strategy"] == {
        "class_path": "lightning.pytorch.strategies.DDPStrategy"
    }


def test_a_missing_or_cyclic_base_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing.yaml"
    missing.write_text("base: gone.yaml\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(missing), "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: {missing}: base: gone.yaml: no such file ({tmp_path / 'gone.yaml'}); "
        "base files are relative to the file that lists them"
    )
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"include each other \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        resolve_bases(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: {file: a.yaml}\n")
    with pytest.raises(ConfigError, match="base: must be a file name or a list of them"):
        resolve_bases(tmp_path / "c.yaml")


def test_tiny_t5_is_tiny_with_another_backbone() -> None:
    tiny, t5 = resolve_bases(CONF / "tiny.yaml"), resolve_bases(CONF / "tiny-t5.yaml")
    assert t5["model"].pop("backbone") == {"name_or_path": "tiny-t5"}
    tiny["model"].pop("backbone", None)
    # tiny.yaml's adapted layers are LLaMA module names; the T5 takes its family's default instead
    assert t5["model"]["molora"].pop("target_modules") is None
    tiny["model"]["molora"].pop("target_modules", None)
    assert t5 == tiny


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Leaf keys of a config mapping; an object given by class_path is one leaf (its arguments are its own)."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _code_defaults() -> dict[str, object]:
    trainer = {
        f"trainer.{name}": p.default
        for name, p in inspect.signature(Trainer.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    trainer["trainer.use_distributed_sampler"] = False  # the CLI's trainer_defaults
    code = {key: list(v) if isinstance(v, tuple) else v for key, v in config_reference.defaults().items()}
    return {**trainer, **code}


@pytest.mark.parametrize(
    "config", sorted([*CONF.glob("*.yaml"), *CONF.glob("*/*.yaml")]), ids=lambda p: str(p.relative_to(CONF))
)
def test_every_key_in_a_config_changes_something(config: Path) -> None:
    """A key that repeats the code's default or its base's value is a second truth for that value."""
    own = yaml.safe_load(config.read_text())
    bases = own.pop(BASE_KEY, None)
    inherited = {}
    for base in [bases] if isinstance(bases, str) else bases or []:
        inherited.update(_leaves(resolve_bases(config.parent / base)))
    defaults = _code_defaults()
    for key, value in _leaves(own).items():
        if key in inherited:
            assert value != inherited[key], f"{config.name}: {key}: {value!r} is already its base's value"
        elif key in defaults:
            assert value != defaults[key], f"{config.name}: {key}: {value!r} is the code's default; drop it"


def test_no_comment_is_repeated_across_config_files() -> None:
    seen: dict[str, Path] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            comment = re.search(r"(?:^|\s)#\s*(.+)$", line)
            if comment is None:
                continue
            text = comment.group(1).strip()
            assert text not in seen or seen[text] == path, f"'# {text}' is in both {seen[text]} and {path}"
            seen[text] = path


def test_readme_config_table_is_the_codes() -> None:
    readme = (REPO / "README.md").read_text()
    expected = config_reference.replace_block(readme, config_reference.render())
    assert readme == expected, (
        "README.md's config table differs from the code; run "
        "`python -m moei_lightning.config_reference --write README.md`"
    )


def test_every_key_of_the_cli_sections_is_documented(capsys: pytest.CaptureFixture) -> None:
    printed = print_config(capsys, CONF / "tiny.yaml")
    documented = set(config_reference.defaults())
    for section, _ in config_reference.SECTIONS:
        node = printed
        for part in section.split("."):
            node = node[part]
        for key in node:
            full = f"{section}.{key}"
            nested = any(name == full for name, _ in config_reference.SECTIONS)
            assert full in documented or nested, f"{full} is a config key without a row in the README's table"
