/* The image's first process: blocks the signals the sidecar takes over, then execs the
   sidecar (argv[1..]). The blocked set survives execve, so a signal sent while the
   interpreter is still starting stays pending until the sidecar handles it; as PID 1,
   with no handler yet, the kernel would drop it. Keep the list equal to
   sidecar/__main__.py's EARLY_BLOCKED (a test compares them). */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    static const int blocked[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCHLD};
    sigset_t set;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof blocked / sizeof blocked[0]; i++)
        sigaddset(&set, blocked[i]);
    if (argc < 2) {
        fputs("usage: sidecar-init COMMAND [ARG...]\n", stderr);
        return 2;
    }
    sigprocmask(SIG_BLOCK, &set, NULL);
    execvp(argv[1], argv + 1);
    fprintf(stderr, "sidecar-init: cannot run %s: ", argv[1]);
    perror(NULL);
    return 127;
}
