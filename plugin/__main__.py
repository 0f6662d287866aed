"""``python -m concept_exclusion`` (e.g. ``accelerate launch -m concept_exclusion train ...``)."""

import sys

from concept_exclusion.commands.main import main

sys.exit(main())
