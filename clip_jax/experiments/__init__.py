"""The CLIP paper's findings reproduced at laptop scale on the built-in synthetic dataset:
`python -m clip_jax.experiments {efficiency,supervised,shift,prompts,few_shot,all} --output DIR`
(docs/paper.md). Each subcommand writes a Markdown table and PNG figures in the style of the
paper's; CLIP models are trained in-process by clip_jax.training and reused from their workdirs."""
