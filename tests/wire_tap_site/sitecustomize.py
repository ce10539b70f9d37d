"""Loaded at start-up by the gateway processes tests start (their PYTHONPATH names this
directory): records every byte the gateway writes to its clients for the leak check
(see tests/wire_tap.py)."""

import os
import sys

if os.environ.get("MACLUSTR_WIRE_TAP"):
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import wire_tap

    wire_tap.record_to_file(os.environ["MACLUSTR_WIRE_TAP"])
