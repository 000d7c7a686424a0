"""Refuse a model name Omni cannot serve before anything is written."""

import re
import sys

NAME = "{{ cookiecutter.model_name }}"
# Workers AI style: @org/name, or @org/family/name; lower case, digits, '-', '.', '_'.
PATTERN = re.compile(r"^@[a-z0-9][a-z0-9-]*(/[a-z0-9][a-z0-9._-]*){1,2}$")

if not PATTERN.match(NAME):
    print(
        f"ERROR: model_name {NAME!r} is not a model name like '@cf/acme/my-model': '@', an "
        "organisation, then one or two '/'-separated parts of lower-case letters, digits, "
        "'-', '.' and '_'",
        file=sys.stderr,
    )
    sys.exit(1)
