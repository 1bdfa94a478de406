"""`python -m clip_jax.convert`: the conversion command line (`clip_jax.convert.main`).

A package's __main__ rather than a `__name__ == "__main__"` block in clip_jax/convert/__init__.py:
`import clip_jax` has already imported clip_jax.convert, and runpy would run that module a second
time.
"""

from clip_jax.convert import main


def run(argv: list[str] | None = None) -> None:
    """The command line, arguments from sys.argv by default."""
    main(argv)


if __name__ == "__main__":
    run()
