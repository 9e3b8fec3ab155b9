# uffdd in a container. userfaultfd needs the host kernel's support and, to follow
# forks and trap kernel-mode faults, CAP_SYS_PTRACE (or root with
# vm.unprivileged_userfaultfd=1). Run with:
#   docker run --rm --cap-add SYS_PTRACE --security-opt seccomp=unconfined \
#       -v /run/uffdd:/run/uffdd uffdd daemon --handover /run/uffdd/handover.sock
# (Docker's default seccomp profile blocks the userfaultfd syscall; /dev/userfaultfd
# can be passed with --device instead on hosts that have it.)
FROM python:3.11-slim-bookworm AS build
# libxxhash-dev: xxhash.h, compiled into the extension (XXH3); nothing of it is needed
# at run time
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libxxhash-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENTRYPOINT ["uffdd"]
CMD ["check"]
