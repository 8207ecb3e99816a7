"""launch/: CLI args -> LaunchPlan (TP/SP/PP/CP/EP/DP-or-FSDP2 lanes, hardware profile) -> torchrun.

``launch.plan`` plans lanes, ``launch.hardware`` holds the H100/H200/B200 profiles, ``launch.adapt``
turns Megatron pretrain recipes into ones with this project's layers; the shell scripts next to this
file start ``megatron-ext train`` under torchrun on one node, several nodes, or SLURM.
"""
