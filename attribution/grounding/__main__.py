import sys

from attribution.grounding.cli import main

sys.exit(main())
