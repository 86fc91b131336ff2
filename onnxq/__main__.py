"""``python -m onnxq`` runs the command line."""

import sys

from onnxq.cli import main

sys.exit(main())
