"""What a process learns from and does with its environment: launcher and SLURM variables
(``launch_env``, ``slurm``), preemption signals (``preemption``), DeepSpeed's /dev/shm buffers
(``shm``). Cheap to import: no torch (launch/pretrain.py installs signal handlers through it first)."""
