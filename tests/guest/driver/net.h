/* virtio-net (virtio 1.2, 5.1): the OP_NET_* commands. */
#ifndef PYVMM_DRIVER_NET_H
#define PYVMM_DRIVER_NET_H

#include "job.h"
#include "virtio.h"

extern struct job *const job_block;
/* Run one OP_NET_* command: index is its position in the job; R_* */
int net_op(struct cmd *c, u32 flags, unsigned index);

#endif
