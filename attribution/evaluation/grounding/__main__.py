import sys

from attribution.evaluation.grounding.cli import main

sys.exit(main())
