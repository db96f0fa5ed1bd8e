"""Tools around runs: the capacity plan and time model, reports, the doctor, the GPU check, model cards."""
