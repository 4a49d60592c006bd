/*
 * slowaccept.c - a TCP server that accepts its connections late, for the
 * test of a dump that meets a connection not accepted yet. It listens on
 * 127.0.0.1 (a port of the kernel's choice), prints "PORT <n>" and
 * "READY <pid>", then every --every MS milliseconds accepts what waits,
 * closes it and prints "ACCEPTED <n>". With --every 0 it never accepts.
 *
 * Build: gcc -O2 -Wall slowaccept.c -o slowaccept
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long every = 400;
	for (int i = 1; i + 1 < argc; i += 2)
		if (strcmp(argv[i], "--every") == 0)
			every = atol(argv[i + 1]);
	int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t n = sizeof(a);
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 16) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &n) < 0) {
		perror("listen");
		return 1;
	}
	printf("PORT %d\nREADY %d\n", ntohs(a.sin_port), getpid());
	fflush(stdout);
	for (long accepted = 0;;) {
		struct timespec ts = {every / 1000, every % 1000 * 1000000};
		if (every == 0)
			ts.tv_sec = 3600;
		nanosleep(&ts, NULL);
		if (every == 0)
			continue;
		int c;
		while ((c = accept(l, NULL, NULL)) >= 0) {
			close(c);
			accepted++;
		}
		printf("ACCEPTED %ld\n", accepted);
		fflush(stdout);
	}
}
