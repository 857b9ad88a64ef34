#ifndef PYVMM_DRIVER_BLK_H
#define PYVMM_DRIVER_BLK_H

#include "job.h"
#include "virtio.h"

extern struct job *const job_block;
/* Run one OP_BLK_* command: index is its position in the job; R_* */
int blk_op(struct cmd *c, u32 flags, unsigned index);

#endif
