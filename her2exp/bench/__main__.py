from her2exp.bench import main

main()
