"""`--task faithdial_wow`: the recipe of tasks/wow.py, which reads args.task to pick the splits."""
from tasks.wow import PRESET, SETTINGS, data_files, load, reward  # noqa: F401 (the task interface)
