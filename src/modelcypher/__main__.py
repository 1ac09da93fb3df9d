import sys

from modelcypher.cli import main

sys.exit(main())
