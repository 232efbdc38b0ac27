#pragma once
// Preemption: SIGUSR1 (Slurm's --signal=B:USR1@N, forwarded by the batch script)
// and SIGTERM (scancel, the end of the time limit) only set a flag. At a step
// boundary every rank calls preemption_agreed(), an all-reduce (max) of the
// flag, so all ranks decide together to checkpoint and exit for requeue even
// when the signal reached only some of them.
#include "parallel/communicator.h"

namespace ssa::parallel {

// Installs the handlers for SIGUSR1 and SIGTERM (idempotent).
void install_preemption_handlers();

// This process received a preemption signal (the number, 0 if none).
int preemption_signal();
bool preemption_requested();

// Collective over `world`: true on every rank when any rank got a signal.
// Uses a CPU tensor, so it runs over MPI whatever the training device.
bool preemption_agreed(Communicator& world);

// Clears the local flag (tests; a process that continues after a checkpoint).
void clear_preemption_flag();

}  // namespace ssa::parallel
