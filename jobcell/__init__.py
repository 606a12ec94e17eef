"""jobcell: one short-lived, memory-capped, sealed cell per document.

    from jobcell import Client

    with Client() as jobs:                      # JOBCELL_DATABASE_URL and the store, as the dispatcher has them
        job = jobs.submit(upload.stream, name=upload.filename, metadata={"tenant": "clinic-7"})
        done = jobs.wait(job.id, timeout=600)   # or: for event in jobs.events(): ...
        text = jobs.result(job.id).text
"""

from importlib.metadata import PackageNotFoundError, version

from dispatcher.errors import JobcellError, NotFound, StateError

from .client import Client, Document, Event, JobView, Page, Result
from .webhooks import BadSignature, verify_webhook

try:
    __version__ = version("jobcell")
except PackageNotFoundError:  # run from a checkout that is not installed
    __version__ = "0+unknown"

__all__ = ["BadSignature", "Client", "Document", "Event", "JobView", "JobcellError", "NotFound", "Page", "Result",
           "StateError", "__version__", "verify_webhook"]
