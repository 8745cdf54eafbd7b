# gunicorn -c examples/fastapi_app/gunicorn.conf.py examples.fastapi_app.app:app
from memguard.gunicorn import install

bind = "127.0.0.1:8000"
workers = 2
worker_class = "uvicorn_worker.UvicornWorker"
graceful_timeout = 30

# Recycle a worker gracefully once it has grown past 160 MiB; memguard's watchdog in the
# master stops one that passes the hard limit mid-request, before the kernel would.
install(globals(), worker_memory_limit="160MiB", worker_memory_hard_limit="320MiB")
