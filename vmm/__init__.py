"""vmm"""

import os

# numpy loads OpenBLAS, which starts a thread per core that keeps polling for work for a while
# after each call; pyvmm's numpy does no linear algebra, and on a small host those threads take
# CPU time from the vCPUs and the I/O threads.  (Read when numpy is first imported: so here.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
