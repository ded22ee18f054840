package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdStatus(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal status: not implemented yet")
	return 1
}
