"""ibau: find and remove backdoors in image classifiers with I-BAU, and gate on the result.

The library API never prints, exits or imports click/rich.
"""

__version__ = "0.1.0"
