"""What ``python -m megatron_bert.train --help`` and ``--cfg job`` print, and the check that turns any
other ``-x`` / ``--x`` argument into one clear error (Hydra would report a lexer exception)."""
from __future__ import annotations

from omegaconf import OmegaConf

from .config import ConfigError, compose, config_dir, to_yaml, validate

USAGE = """\
usage: torchrun --nproc_per_node=N -m megatron_bert.train [key=value ...]
       python -m megatron_bert.train [key=value ...]            (one process)
       python -m megatron_bert.train --cfg job [key=value ...]  (print the resolved config, then exit)

Every key below is overridden as key=value (lists as key=[a,b]); a config group takes one of its
options as group=option and its keys then follow that option's file in configs/. README.md has the
reference, configs/ the comments; --cfg job shows every value a run would use.
"""


def groups() -> dict[str, tuple[list[str], str]]:
    """group -> (its options, the default one), from configs/."""
    root = config_dir()
    defaults = {}
    for entry in OmegaConf.load(root / "config.yaml").get("defaults", []):
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            defaults.update(dict(entry))
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out[d.name] = (sorted(f.stem for f in d.glob("*.yaml")), str(defaults.get(d.name, "")))
    return out


def help_text() -> str:
    cfg = compose([])
    lines = [USAGE, "config groups (group=option):"]
    for name, (options, default) in groups().items():
        lines.append(f"  {name}={'|'.join(options)}  (default: {default})")
    lines.append("")
    lines.append("keys (section.key=value):")
    for section, value in cfg.items():
        if OmegaConf.is_dict(value):
            lines.append(f"  {section}.*: {', '.join(str(k) for k in value.keys())}")
        else:
            lines.append(f"  {section}: {value}")
    return "\n".join(lines) + "\n"


def handle_flags(argv: list[str], world_size: int | None) -> str | None:
    """The text to print for ``--help`` / ``--cfg job`` (then exit 0), None for a normal run; any other
    dash argument is a ConfigError naming it. ``world_size``: the launcher's, None outside one (the
    config is then checked as if run on parallel.tensor processes)."""
    if any(a in ("-h", "--help") for a in argv):
        return help_text()
    rest = list(argv)
    show = False
    if "--cfg" in rest:
        i = rest.index("--cfg")
        what = rest[i + 1] if i + 1 < len(rest) else ""
        if what != "job":
            raise ConfigError(f"--cfg {what}".strip() + ": only --cfg job (print the resolved config) is supported")
        del rest[i:i + 2]
        show = True
    for a in rest:
        if a in ("-m", "--multirun"):
            raise ConfigError(f"{a}: Hydra's multirun is not used here; python launch/sweep.py --nproc N "
                              "key=a,b -- key=value ... runs one torchrun per setting")
        if a.startswith("-"):
            raise ConfigError(f"unknown option {a}: arguments are key=value overrides (python -m megatron_bert.train "
                              "--help lists the keys)")
    if not show:
        return None
    cfg = compose(rest)
    validate(cfg, world_size if world_size is not None else max(1, cfg.parallel.tensor))
    return to_yaml(cfg)
