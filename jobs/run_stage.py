"""Ray job entrypoint: ``python jobs/run_stage.py STAGE --config FILE --set key=value --run-dir DIR``.

Runs the same stage function as ``rayllm STAGE`` and prints its summary as JSON; a user error prints
one ``error:`` line and exits 2. `rayllm submit` builds this command; KubeRay RayJobs can use it as is.
"""

import sys

from rayllm.jobs import entrypoint

if __name__ == "__main__":
    sys.exit(entrypoint())
