"""``python -m loramix_autoload``: import peft as any script would, print :func:`loramix_autoload.status`.

Exit status 0 when loramix's methods are registered, 1 otherwise.
"""

import sys

import peft  # noqa: F401  (what triggers the registration)

import loramix_autoload

line = loramix_autoload.status()
print(line)
sys.exit(0 if line.startswith("active") else 1)
