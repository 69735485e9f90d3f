"""Simulated edge devices, no Flower: profiles and fleets (`profiles`), the simulated clock (`clock`), exact
training-memory accounting (`memory`), FLOP counts (`flops`), budget plans that adapt or refuse (`budget`), the
real cap on a CUDA GPU (`gpu`), and `device.Device.run`: plan, then run or refuse."""
