"""Compatibility names for the modules clip_jax/data/pipeline.py was split into, by job:
sources (protocols, skip reasons, permutations), decode (one example), workers (the pool),
iterator (TrainIterator, the factory, checkpoint states) and config (the `config.data` schema).
Import from those; this module goes once nothing imports it."""

from __future__ import annotations

from clip_jax.data.config import default_data_config  # noqa: F401
from clip_jax.data.decode import (  # noqa: F401
    ExamplePreparer,
    ImageLimits,
    choose_caption,
    decode_image,
    normalize_images,
    preparer_from_config,
    to_rgb,
)
from clip_jax.data.iterator import (  # noqa: F401
    MAX_SKIPS_IN_A_ROW,
    SOURCE_NAMES,
    STATE_VERSION,
    TrainIterator,
    caption_sample,
    gather_states,
    local_state,
    make_train_iterator,
    make_train_source,
    summed_counters,
)
from clip_jax.data.sources import (  # noqa: F401
    CONVERTED_IMAGE_MODE,
    COUNTER_NAMES,
    SKIP_REASONS,
    ExampleSource,
    ImageData,
    RawExample,
    RecordReader,
    SkippedExample,
    check_process_layout,
    epoch_permutation,
    even_share,
    example_contents,
    example_rng,
    new_counters,
    permuted_indices,
)
from clip_jax.data.workers import (  # noqa: F401
    WORKER_KINDS,
    PreparerWithReader,
    WorkerPool,
    default_num_workers,
    prepared_in_order,
)
