"""`python tests/mock_tfds_train.py NUM_EXAMPLES [train.py flags]`: train.py with TFDS's mock data.

`tfds.testing.mock_data` patches TFDS in the process that enters it, so a test that runs train.py
in subprocesses on a mocked TFDS dataset starts them through this file (every process of a
multi-process run gets the same mocked examples: the mock draws them from fixed seeds).
"""

import os
import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
    num_examples = int(sys.argv.pop(1))
    train_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    with tfds.testing.mock_data(num_examples=num_examples):
        sys.argv[0] = train_py
        runpy.run_path(train_py, run_name="__main__")
