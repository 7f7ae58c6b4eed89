"""Rank discovery for pre-fitting: which process this is, and the two collectives it needs."""

from __future__ import annotations

from datetime import timedelta


class Ranks:
    """This process's rank and the two collective steps prefit needs (gather, barrier).

    Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) this is accelerate's
    ``PartialState`` on gloo: the collectives carry a few small Python objects, so they need no
    GPU, and the timeout is long because ranks may finish hours apart after a resume. Otherwise
    it is rank 0 of 1 and touches no global state."""

    def __init__(self):
        from accelerate.utils import get_int_from_env

        world = get_int_from_env(
            ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1
        )
        self.state = None
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        if world > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=True, timeout=timedelta(hours=48))
            self.rank = self.state.process_index
            self.world_size = self.state.num_processes
            self.local_rank = self.state.local_process_index

    def gather(self, obj) -> list:
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
