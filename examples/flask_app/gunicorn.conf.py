# gunicorn -c examples/flask_app/gunicorn.conf.py examples.flask_app.app:app
from memguard.gunicorn import install

bind = "127.0.0.1:8000"
workers = 2
worker_class = "gthread"
threads = 4
graceful_timeout = 30

install(globals(), worker_memory_limit="160MiB", worker_memory_hard_limit="320MiB")
