"""Backends (simulated, torch.distributed), plan execution, and the communication ledger."""

from ._launch import Workers as Workers
from ._launch import launch as launch
from ._ledger import CommLedger as CommLedger
from ._ledger import CommRecord as CommRecord
from ._ledger import comm_ledger as comm_ledger
from ._redistribute import execute as execute
from ._simulated import SimulatedBackend as SimulatedBackend
