package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdLogs(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal logs: not implemented yet")
	return 1
}
