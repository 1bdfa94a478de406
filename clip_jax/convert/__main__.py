"""`python -m clip_jax.convert`: the conversion command line (`clip_jax.convert.main`).

A package's __main__ rather than a `__name__ == "__main__"` block in clip_jax/convert/__init__.py:
`import clip_jax` has already imported clip_jax.convert (through clip_jax.api), and runpy would run
that module a second time. --to-hf and --to-open-clip read their source with `clip_jax.api`'s
loader, which also reads training workdirs, and a workdir given as a checkpoint to convert is
recognised as one (a layer clip_jax.convert itself does not import).
"""

from clip_jax import api
from clip_jax.convert import main


def _load(path: str, model: str | None, activation: str | None, trust_torchscript: bool):
    overrides = {"activation": activation} if activation else {}
    clip, variables, _, tokenizer = api.load(path, model, trust_torchscript=trust_torchscript, **overrides)
    return clip.config, variables, tokenizer


def run(argv: list[str] | None = None) -> None:
    """The command line (arguments from sys.argv by default), with the loaders that know workdirs."""
    main(argv, load=_load, is_training_workdir=api.is_training_workdir)


if __name__ == "__main__":
    run()
