"""Contract-suite entry for the local backend (local/): no CLI to fake, jobs are local processes."""

from contract_util import processes_under

FOLDER = "local"


def setup(tmp, repo):
    # CPU slots whatever the machine has (no GPU is assumed), and enough of them that the tests'
    # jobs never queue unless a test asks for it (AR_LOCAL_SLOTS=1)
    env = dict(CUDA_VISIBLE_DEVICES="", AR_LOCAL_SLOTS="4")
    return env, lambda: processes_under(repo / ".ar")
