"""virtio"""

import vmm  # noqa: F401  (first: its settings for numpy)
