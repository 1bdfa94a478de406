"""Training and evaluation data. One module per job, each importing only those listed above it:

sources.py         what every source shares: RawExample, the ExampleSource and RecordReader
                   protocols, skip reasons and counters, seeds, permutations, process shares
config.py          the `config.data` schema (default_data_config)
decode.py          one example: image decoding under limits, caption choice, the random
                   resized crop (ExamplePreparer), the per-batch normalisation
workers.py         ordered parallel preparation in worker threads or processes
synthetic_render.py  the built-in dataset's drawing: palette, shape masks, ShapeRenderer
synthetic_tasks.py the built-in dataset's words, downstream tasks and shifted sets
synthetic.py       the built-in coloured-shapes dataset (SyntheticShapes), and SyntheticSource
tfds.py            TFDS datasets as sources (random access or tf.data)
shards.py          WebDataset tar shards: naming, opening, reading one into samples under limits
webdataset.py      img2dataset / WebDataset tar shards as a source
iterator.py        TrainIterator (batches, exact state, counters), the factory that picks
                   the source by data.name, the tokenizer's caption sample, checkpoint states
prefetch.py        feeding the step: global arrays from each process's rows, a prefetch thread
classification.py  TFDS classification datasets for evaluation (uses decode and workers)
"""
