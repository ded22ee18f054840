package main

// STUBS: each command moves to its own file as its owner implements it.

import (
	"fmt"
	"os"
)

func notYet(name string) int {
	fmt.Fprintf(os.Stderr, "shoal %s: not implemented yet\n", name)
	return 1
}

func cmdRun(args []string) int    { return notYet("run") }
func cmdStatus(args []string) int { return notYet("status") }
func cmdLogs(args []string) int   { return notYet("logs") }
func cmdReload(args []string) int { return notYet("reload") }
func cmdToken(args []string) int  { return notYet("token") }
func cmdBench(args []string) int  { return notYet("bench") }
