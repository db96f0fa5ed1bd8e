import sys

from opsd_ray.cli import main

sys.exit(main())
