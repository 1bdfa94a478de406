"""Reading models, in every format clip_jax knows, below the layers that train or evaluate them.

- `model_directory`: self-contained clip_jax model directories, written atomically and read back;
- `training_workdir`: the newest restorable checkpoint of a `train.py` workdir, read-only;
- `torch_checkpoint`: OpenAI / open_clip / Hugging Face PyTorch and safetensors files;
- `openclip_layout`: open_clip's state-dict layout <-> Flax variables (the one rules table);
- `hf_layout`: transformers' `CLIPModel` names and config.json, one table read both ways;
- `loading.load_any`: the one entry over all of them, `(config, variables, tokenizer)`.
"""

from clip_jax.io.loading import is_training_workdir, load_any

__all__ = ["is_training_workdir", "load_any"]
