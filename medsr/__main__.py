"""``python -m medsr ...`` (what ``torchrun -m medsr train ...`` runs)."""

from medsr.cli import app

if __name__ == "__main__":
    app()
