"""`python -m clip_jax.convert`: the conversion command line (`clip_jax.convert.main`).

A package's __main__ rather than a `__name__ == "__main__"` block: `import clip_jax` has already
imported clip_jax.convert (through clip_jax.api), and runpy would run that module a second time.
"""

from clip_jax.convert import main

main()
